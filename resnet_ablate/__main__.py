"""`python -m resnet_ablate` is `ablate`."""

from .cli import main

main()
