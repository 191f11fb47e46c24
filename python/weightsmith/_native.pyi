"""Type stubs of the native module (weightsmith._native)."""

from typing import Any, Callable, List, Optional, Tuple

__version__: str

class Error(Exception):
    """A weightsmith failure; the message names the file, tensor or field."""

class Tensor:
    """One loaded tensor, DLPack-capable and zero-copy."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> List[int]: ...
    @property
    def device(self) -> str: ...
    def to_bytes(self) -> bytes: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    def __dlpack__(
        self,
        stream: Optional[Any] = None,
        max_version: Optional[Any] = None,
        dl_device: Optional[Any] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...

def call(argv: List[str], progress: Optional[Callable[[int, int, str], None]] = None) -> str: ...
def load(
    argv: List[str],
    progress: Optional[Callable[[int, int, str], None]] = None,
    host_only: bool = False,
) -> Tuple[str, List[Tensor]]: ...
def main(argv: List[str]) -> int: ...
def live_models() -> int: ...
