"""The names of the models in a served Triton repository: the generator writes them, the BLS and the front end
call them. Component models carry their graph's name (docs/tensor_contract.md)."""

from __future__ import annotations

BLS_MODEL = "omnigen2"  # the denoising loop, the API's Generate
MLLM_MODEL = "mllm"  # Qwen2.5-VL: Understand, and the BLS's prompt encoder (the text_encoder graph)
VAE_ENCODER = "vae_encoder"
TRANSFORMER = "transformer"
VAE_DECODER = "vae_decoder"
COMPONENT_MODELS = (VAE_ENCODER, TRANSFORMER, VAE_DECODER)
SAFETY_CLASSIFIER = "safety_classifier"  # the optional output-image classifier (docs/tensor_contract.md)
