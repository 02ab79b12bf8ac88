"""Python SDK for the OmniGen2 serving API: text-to-image, editing, composition and understanding over gRPC.

from omnigen2 import OmniGen2Client
with OmniGen2Client("127.0.0.1:50051") as client:
    client.generate("A red apple on a table", seed=7).images[0].save("apple.png")
"""

from omnigen2.client import AsyncOmniGen2Client, OmniGen2Client
from omnigen2.errors import (
    CancelledError,
    DeadlineExceededError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    OmniGen2Error,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from omnigen2.messages import (
    ChatTurn,
    GenerationOptions,
    GenerationResult,
    GenerationUsage,
    ImageInput,
    Latents,
    Progress,
    SafetyFinding,
    UnderstandOptions,
    UnderstandResult,
    WithheldImage,
)

__all__ = [
    "AsyncOmniGen2Client",
    "CancelledError",
    "ChatTurn",
    "DeadlineExceededError",
    "FieldViolation",
    "GenerationOptions",
    "GenerationResult",
    "GenerationUsage",
    "ImageInput",
    "InternalError",
    "InvalidArgumentError",
    "Latents",
    "OmniGen2Client",
    "OmniGen2Error",
    "PermissionDeniedError",
    "Progress",
    "ResourceExhaustedError",
    "SafetyFinding",
    "UnavailableError",
    "UnderstandOptions",
    "UnderstandResult",
    "WithheldImage",
]
