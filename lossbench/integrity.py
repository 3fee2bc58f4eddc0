"""Is a file that ``torch.save`` wrote still the file it wrote?

``torch.save`` writes a zip archive (PyTorch's ``PyTorchStreamWriter``), and the zip format stores a
CRC-32 of every member (PKWARE APPNOTE, section 4.4.7), but ``torch.load`` does not check them: a
flipped bit or a zeroed block inside a tensor record loads as different weights without an error.
:func:`zip_damage` reads every member back through :mod:`zipfile`, which checks its CRC-32.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Optional, Union

__all__ = ["zip_damage"]

_CHUNK = 1 << 20
#: Compression methods :mod:`zipfile` decodes (``torch.save`` writes stored members).
_DECODABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def zip_damage(path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """What is wrong with the zip archive ``path``, or ``None`` when every member's CRC-32 matches.

    A file that is not a zip archive at all (a truncated file whose central directory is gone, or
    the legacy pre-1.6 ``torch.save`` format) also gives ``None``: it has no CRCs to check, and the
    reader that opens it next reports what it finds.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError):
        return None
    with archive:
        for info in archive.infolist():
            if info.compress_type not in _DECODABLE:  # a damaged header names an unknown method
                return f"unreadable member {info.filename!r} (compression method {info.compress_type})"
            try:
                with archive.open(info) as member:
                    while member.read(_CHUNK):
                        pass
            except zipfile.BadZipFile as err:  # "Bad CRC-32 for file ...", "Bad magic number for file header"
                if "CRC" in str(err):
                    return f"CRC mismatch in member {info.filename!r}"
                return f"damaged member {info.filename!r} ({err})"
            except (EOFError, ValueError, OSError, zlib.error) as err:
                return f"unreadable member {info.filename!r} ({type(err).__name__}: {err})"
    return None
