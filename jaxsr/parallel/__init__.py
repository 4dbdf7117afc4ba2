"""Device meshes, sharding rules from configs, host <-> global array helpers."""
