"""Print README command N (1: install + generate, 2: the tests): the non-comment lines of README.md's first
```bash block, in order. .ci/run runs what this prints, so CI runs the README's commands exactly as typed."""
import sys
from pathlib import Path


def readme_commands(readme: Path) -> list[str]:
    text = readme.read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    commands = readme_commands(Path(__file__).resolve().parent.parent / "README.md")
    print(commands[int(sys.argv[1]) - 1])
