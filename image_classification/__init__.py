"""Image classification track: CBT on ImageNet-1K (and the bundled digits demo)."""
