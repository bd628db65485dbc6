"""``python -m cliplab ...`` is the ``cliplab`` command (for environments where the script is not on PATH)."""

from cliplab.cli import main

if __name__ == "__main__":
    main(prog_name="cliplab")
