"""The API's bounds that clients check before a call, from the one place the server takes them too
(serving/pipeline/request.py, chat_request.py): the ComfyUI nodes' inputs stop where the server's do. An operator's
--limits may lower a served bound; `OmniGen2Client.info().limits` reports the bounds in force."""

MAX_INPUT_IMAGES = 5  # the transformer has 5 image-index embeddings
MAX_SEED = 2**63 - 1  # int64 on the wire, never negative
# Random seeds (the server's and the SDK's draws) stay below 2^53: JSON readers that hold numbers as doubles
# (JavaScript, jq, the web UI's fields) keep these exactly, so a seed read from an answer reproduces it when sent back.
RANDOM_SEEDS = 2**53
MAX_SEQUENCE_LENGTH = 1024  # prompt tokens kept: the full checkpoint's text positions (the official default too)
MAX_NEW_TOKENS = 2048  # tokens of one Understand answer
MAX_TOP_K = 1000  # Understand's top_k (0: off)
# Understand's temperature below this decodes greedily (the seed unused): logits divided by 1e-40 overflow to inf.
MIN_TEMPERATURE = 0.01
MIN_TOP_P = 0.01  # the least top_p the UIs offer: the server takes (0, 1]
MIN_MAX_PIXELS = 16 * 16  # max_pixels: one patch at least
# Understand's max_pixels: Qwen2.5-VL's processor takes no fewer pixels per image (its min_pixels, 4 merged patches;
# the served checkpoint's too). One bound for every request, with images or not.
MIN_VISION_PIXELS = 56 * 56
MIN_INPUT_IMAGE_SIDE = 16  # max_input_image_side_length
