"""Print the recipe-key reference table (Markdown) that README.md embeds.

    python scripts/config_reference.py     # paste between the CONFIG-TABLE markers
"""

from trainer.config import JobConfig


def table() -> str:
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for flag, default, help_text in JobConfig.help_rows():
        rows.append(f"| `{flag[2:]}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
