"""Building blocks shared by the networks: attention, resnet and transformer blocks."""
