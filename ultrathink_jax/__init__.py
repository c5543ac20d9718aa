"""UltraThink-JAX. Importing the package configures glibc malloc for the XLA CPU backend first (`cpu_malloc`)."""

from ultrathink_jax import cpu_malloc

cpu_malloc.configure()
