"""Run mutmut's mutants without its trampolines: each mutant's diff applied to a clean copy.

mutmut 3 routes every call of a mutated function through a trampoline; for the solver's deep
recursion (countdown._combinations) and the sft producer's model forward that makes a mutant
take minutes. This applies each mutant's diff (`mutmut show NAME`) to the file itself, runs the
given tests natively, and restores the file. Not in CI (tests/mutation.md).

    mutmut run "countdown.x__solution__mutmut_1"   # once: generates mutants/ and its names
    python tests/mutants_native.py NAMES.txt MUTMUT_DIR COPY_DIR countdown.py \
        tests/test_countdown.py -k "solver or splits"

NAMES.txt: one mutant name a line. MUTMUT_DIR: where `mutmut show` runs. COPY_DIR: a scratch
copy of the repository (its FILE is rewritten while a mutant runs). Prints NAME killed /
SURVIVED / timeout, one a line.
"""

import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 240


def mutated(source: str, diff: str, function: str) -> str | None:
    """`source` with the diff's hunk applied inside `function` (None when it does not apply)."""
    old, new = [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++", "@@", "#")):
            continue
        body = line[1:]
        if line.startswith("-"):
            old.append(body)
        elif line.startswith("+"):
            new.append(body)
        else:  # context (a space, or an empty line)
            old.append(body)
            new.append(body)
    start = source.index(f"def {function}(")
    i = source.find("\n".join(old), start)
    if i < 0:
        return None
    return source[:i] + "\n".join(new) + source[i + len("\n".join(old)):]


def main(names_file: str, mutmut_dir: str, copy_dir: str, target: str, *tests: str) -> None:
    path = Path(copy_dir) / target
    original = path.read_text()
    try:
        for name in Path(names_file).read_text().split():
            diff = subprocess.run(["mutmut", "show", name], cwd=mutmut_dir, capture_output=True,
                                  text=True, check=True).stdout
            function = name.split(".x_", 1)[1].split("__mutmut")[0]
            text = mutated(original, diff, function)
            if text is None:
                print(name, "does-not-apply", flush=True)
                continue
            path.write_text(text)
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                    "no:cacheprovider", *tests], check=False, cwd=copy_dir,
                                   capture_output=True, timeout=TIMEOUT_S)
                status = "killed" if r.returncode != 0 else "SURVIVED"
            except subprocess.TimeoutExpired:
                status = "timeout"
            print(name, status, flush=True)
    finally:
        path.write_text(original)


if __name__ == "__main__":
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
