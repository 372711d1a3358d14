"""The worker protocol (being split into submodules; this commit only moves the file)."""
from worker.protocol import messages as _messages

globals().update({k: v for k, v in vars(_messages).items() if not k.startswith("__")})
__all__ = _messages.__all__
