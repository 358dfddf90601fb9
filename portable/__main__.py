"""`python -m portable ...`: the console script without installing it (for example on a machine that only has the
dependencies and this checkout)."""

from portable.launch import main

main()
