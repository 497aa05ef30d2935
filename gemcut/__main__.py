"""`python -m gemcut ...` is the `gemcut` command; launchers that take a module use it:

    torchrun --nproc_per_node 2 -m gemcut train examples/distributed_sft.yaml
"""

from gemcut.cli import main

main()
