"""mlx-flash: LLM in a Flash (arXiv 2312.11514) on MLX."""

__version__ = "0.1.0"
