import json
from pathlib import Path


def write_json(path, result) -> None:
    """A benchmark's result as JSON at `path` (folders made as needed), and where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")
