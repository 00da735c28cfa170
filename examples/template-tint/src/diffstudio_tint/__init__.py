"""diffstudio-tint: an example third-party Diffusion Template package (template ``example/tint``)."""
