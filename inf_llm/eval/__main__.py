"""`python -m inf_llm.eval ARGS` (console script `inf-llm-eval`): lm-eval's command line with the model `inf-llm`.

lm-eval 0.4.13 finds a model by name only in its registry, which third-party packages fill by being imported (it
reads no entry points), so `lm_eval --model inf-llm` alone reports an unknown model. This command imports
`inf_llm.eval.lm` (which registers `inf-llm`) and then hands ARGS to lm-eval's own command line, unchanged:

    python -m inf_llm.eval --model inf-llm --model_args inf_llm_config=smollm2-inf-llm,device=cpu \\
        --include_path DIR --tasks inf_llm_prose --apply_chat_template
"""

from __future__ import annotations

import sys

INSTALL_HINT = 'pip install -e ".[eval]"'


def main(argv: list[str] | None = None) -> int:
    try:
        import inf_llm.eval.lm  # noqa: F401  (registers the model "inf-llm")
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "lm_eval":
            raise
        print(f"error: lm-eval is not installed; install the eval extra: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
