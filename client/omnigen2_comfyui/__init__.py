"""OmniGen2 nodes for ComfyUI: Generate, Edit / Compose and Understand, calling a running OmniGen2 server.

ComfyUI imports this folder from custom_nodes/ and reads the two mappings below (README.md: how to install).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
