"""OmniGen2Client (blocking) and AsyncOmniGen2Client (asyncio) over the OmniGen2 gRPC API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Unpack

import grpc

from omnigen2.errors import from_rpc_error
from omnigen2.messages import (
    ChatTurn,
    GenerationOptions,
    GenerationResult,
    ImageInput,
    Progress,
    UnderstandOptions,
    UnderstandResult,
    build_request,
    build_understand_request,
)
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc

DEFAULT_SERVER = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
Event = Progress | GenerationResult


def channel_options(retries: int) -> list[tuple[str, Any]]:
    """Message sizes, and gRPC's own retry policy: UNAVAILABLE is retried with exponential backoff.

    Streams are retried only until their first event arrives, so no progress is ever replayed.
    """
    policy = {
        "methodConfig": [
            {
                "name": [{"service": "omnigen2.v1.OmniGen2"}],
                "retryPolicy": {
                    "maxAttempts": max(2, min(retries + 1, 5)),  # gRPC caps attempts at 5
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        ("grpc.service_config", json.dumps(policy)),
    ]


def _credentials(tls: bool | bytes) -> grpc.ChannelCredentials | None:
    """tls=True: verify the server against the system's CAs; bytes: against this PEM root certificate."""
    if tls is False:
        return None
    return grpc.ssl_channel_credentials(root_certificates=tls if isinstance(tls, bytes) else None)


def _open_channel(module: Any, server: str, retries: int, tls: bool | bytes) -> Any:
    """A channel from `grpc` or `grpc.aio` (the same two functions in each)."""
    options = channel_options(retries)
    credentials = _credentials(tls)
    if credentials is None:
        return module.insecure_channel(server, options)
    return module.secure_channel(server, credentials, options)


class _Calls:
    """What every call carries: the default deadline, and the bearer token when there is one."""

    def __init__(self, timeout: float | None, token: str | None) -> None:
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _call_options(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "metadata": self._metadata}


def _last_result(stream: Iterator[str | UnderstandResult]) -> UnderstandResult:
    result = None
    for item in stream:
        if isinstance(item, UnderstandResult):
            result = item
    assert result is not None  # a stream ends with its result or raises
    return result


class OmniGen2Client(_Calls):
    """Blocking client. `timeout` (seconds) is the default deadline of each call; None waits forever. `token` is
    sent as a bearer token; `tls` turns on TLS (True: system CAs; bytes: a PEM root certificate to trust).

    >>> client = OmniGen2Client("127.0.0.1:50051")
    >>> client.generate("A red apple on a table", steps=30, seed=7).images[0].save("apple.png")
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        timeout: float | None = 600.0,
        retries: int = 4,
        token: str | None = None,
        tls: bool | bytes = False,
    ) -> None:
        super().__init__(timeout, token)
        self._channel = _open_channel(grpc, server, retries, tls)
        self._stub = pb_grpc.OmniGen2Stub(self._channel)

    def generate(
        self, prompt: str, images: Sequence[ImageInput] = (), **options: Unpack[GenerationOptions]
    ) -> GenerationResult:
        """Text-to-image, or with `images` any of the image tasks; returns when the images are done."""
        request = build_request(prompt, list(images), options)
        try:
            response = self._stub.Generate(request, **self._call_options())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return GenerationResult.from_proto(response)

    def edit(self, image: ImageInput, instruction: str, **options: Unpack[GenerationOptions]) -> GenerationResult:
        """Edit one image by an instruction ("Make the sky stormy")."""
        return self.generate(instruction, [image], **options)

    def compose(
        self, images: Sequence[ImageInput], prompt: str, **options: Unpack[GenerationOptions]
    ) -> GenerationResult:
        """A new image from up to 5 input images and a prompt that refers to them."""
        return self.generate(prompt, images, **options)

    def stream(
        self,
        prompt: str,
        images: Sequence[ImageInput] = (),
        *,
        previews: bool = False,
        **options: Unpack[GenerationOptions],
    ) -> Iterator[Event]:
        """A Progress per denoising step (with a preview image if asked), then the GenerationResult.

        Stopping the iteration early (break, close()) cancels the generation on the server.
        """
        request = build_request(prompt, list(images), options, previews)
        call = self._stub.GenerateStream(request, **self._call_options())
        try:
            for event in call:
                if event.HasField("progress"):
                    yield Progress.from_proto(event.progress)
                else:
                    yield GenerationResult.from_proto(event.result)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    def understand_stream(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Sequence[ImageInput] = (),
        **options: Unpack[UnderstandOptions],
    ) -> Iterator[str | UnderstandResult]:
        """The answer's text pieces as they are generated, then the UnderstandResult.

        `prompt` is a question about `images`, or a whole conversation (ChatTurn list, images inside).
        Stopping the iteration early cancels the generation on the server.
        """
        call = self._stub.Understand(
            build_understand_request(prompt, images, options), timeout=self.timeout, metadata=self._metadata
        )
        try:
            for event in call:
                yield event.delta if event.HasField("delta") else UnderstandResult.from_proto(event.result)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def understand(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Sequence[ImageInput] = (),
        **options: Unpack[UnderstandOptions],
    ) -> UnderstandResult:
        """The whole answer at once: `client.understand("What is in the picture?", ["cat.png"]).text`."""
        return _last_result(self.understand_stream(prompt, images, **options))

    def info(self) -> pb.ModelInfo:
        """The served model: limits, defaults, schedulers, formats, backend and checkpoint hash."""
        try:
            info: pb.ModelInfo = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return info

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OmniGen2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncOmniGen2Client(_Calls):
    """The asyncio twin of OmniGen2Client, for many concurrent calls from one event loop."""

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        timeout: float | None = 600.0,
        retries: int = 4,
        token: str | None = None,
        tls: bool | bytes = False,
    ) -> None:
        super().__init__(timeout, token)
        self._channel = _open_channel(grpc.aio, server, retries, tls)
        self._stub = pb_grpc.OmniGen2Stub(self._channel)

    async def generate(
        self, prompt: str, images: Sequence[ImageInput] = (), **options: Unpack[GenerationOptions]
    ) -> GenerationResult:
        request = build_request(prompt, list(images), options)
        try:
            response = await self._stub.Generate(request, **self._call_options())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return GenerationResult.from_proto(response)

    async def edit(self, image: ImageInput, instruction: str, **options: Unpack[GenerationOptions]) -> GenerationResult:
        return await self.generate(instruction, [image], **options)

    async def compose(
        self, images: Sequence[ImageInput], prompt: str, **options: Unpack[GenerationOptions]
    ) -> GenerationResult:
        return await self.generate(prompt, images, **options)

    async def stream(
        self,
        prompt: str,
        images: Sequence[ImageInput] = (),
        *,
        previews: bool = False,
        **options: Unpack[GenerationOptions],
    ) -> AsyncIterator[Event]:
        request = build_request(prompt, list(images), options, previews)
        call = self._stub.GenerateStream(request, **self._call_options())
        try:
            async for event in call:
                if event.HasField("progress"):
                    yield Progress.from_proto(event.progress)
                else:
                    yield GenerationResult.from_proto(event.result)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def understand_stream(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Sequence[ImageInput] = (),
        **options: Unpack[UnderstandOptions],
    ) -> AsyncIterator[str | UnderstandResult]:
        call = self._stub.Understand(
            build_understand_request(prompt, images, options), timeout=self.timeout, metadata=self._metadata
        )
        try:
            async for event in call:
                yield event.delta if event.HasField("delta") else UnderstandResult.from_proto(event.result)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def understand(
        self,
        prompt: str | Sequence[ChatTurn],
        images: Sequence[ImageInput] = (),
        **options: Unpack[UnderstandOptions],
    ) -> UnderstandResult:
        result = None
        async for item in self.understand_stream(prompt, images, **options):
            if isinstance(item, UnderstandResult):
                result = item
        assert result is not None  # a stream ends with its result or raises
        return result

    async def info(self) -> pb.ModelInfo:
        try:
            info: pb.ModelInfo = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return info

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncOmniGen2Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
