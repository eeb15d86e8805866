"""resnet-ablate: architecture ablations of residual networks, tracked in MLflow."""
