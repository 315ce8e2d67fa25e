"""Reading YAML mapping files (configs, policies) and reporting pydantic validation errors as one
line per problem, each naming the dotted path of the field (imports nothing of rayfp4)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each starting with the dotted path of the field."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        path = ".".join(p for p in (prefix, loc) if p)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        # Whole-model checks have no location; their messages name the fields themselves.
        lines.append(f"{path}: {msg}" if path else msg)
    return "\n".join(lines)


def read_yaml_mapping(path: str | Path, what: str, error: type[ValueError], allow_empty: bool = True) -> dict:
    """The mapping in a YAML file, or ``error`` naming the file and the problem (missing, a
    directory, unreadable, not UTF-8, not YAML, not a mapping; empty unless ``allow_empty``)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise error(f"{p}: no such {what} file") from None
    except IsADirectoryError:
        raise error(f"{p}: is a directory, not a {what} file") from None
    except PermissionError:
        raise error(f"{p}: permission denied reading the {what} file") from None
    except OSError as e:
        raise error(f"{p}: cannot read the {what} file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{p}: not a UTF-8 text file (byte {e.start} is 0x{e.object[e.start]:02x}); "
                    f"a {what} file is YAML text") from None
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None and not allow_empty:
        raise error(f"{p}: the {what} file is empty")
    if data is not None and not isinstance(data, dict):
        raise error(f"{p}: expected a mapping of {what} fields, got {type(data).__name__}")
    return data or {}
