"""Model-family adapters: load a local diffusers folder, encode, predict, decode, train."""
