"""Copy bench/results/NAME.md into README.md between its markers, so the
README quotes measured tables instead of numbers typed by hand.

    python bench/quote.py          # refresh every quoted result

README markers: <!-- bench:NAME --> ... <!-- /bench:NAME -->
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"(<!-- bench:([\w-]+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)

    def fill(m: re.Match) -> str:
        src = ROOT / "bench" / "results" / f"{m.group(2)}.md"
        if not src.is_file():
            print(f"quote: {src} missing; leaving its README section as it is", file=sys.stderr)
            return m.group(0)
        body = src.read_text().split("\n", 1)[1].strip()  # drop the file's own title
        return f"{m.group(1)}Quoted from `bench/results/{src.name}`:\n\n{body}\n{m.group(4)}"

    new, n = pattern.subn(fill, text)
    readme.write_text(new)
    print(f"quote: refreshed {n} section(s) of {readme.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
