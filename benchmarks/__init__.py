"""Benchmarks: each runs its baseline in the same run and prints the ratio.

Every benchmark starts daemons, engines and CLIs as new interpreters: the project is
compiled first (`compile_project`), as an installed daemon is, so that no process's
figures include compiling its own sources.
"""

from tests.support.processes import compile_project

compile_project()
