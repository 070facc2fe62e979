"""The README's configuration table names every config key, so a new key cannot go undocumented."""

import re
from pathlib import Path

from longloom.config import LongloomConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_rows() -> dict[str, str]:
    rows = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_readme_config_table_lists_every_key():
    rows = _table_rows()
    missing = []
    for section, field in LongloomConfig.model_fields.items():
        spans = re.findall(r"`([^`]+)`", rows.get(section, ""))
        documented = {name.strip() for span in spans for name in span.split(",")}
        for key, sub_field in field.annotation.model_fields.items():
            name = sub_field.alias or key
            if name not in documented:
                missing.append(f"{section}.{name}")
    assert not missing, f"README's configuration table does not name: {', '.join(missing)}"
