"""``%nexa_config``: set the session's defaults, show what they resolve to, or save them."""

from __future__ import annotations

from IPython.core.error import UsageError

from nexa_nb import text
from nexa_nb.commands.errors import core_errors
from nexa_nb.flags import options_of
from nexa_nb.plan import make_plan
from nexa_nb.session import Session


def run(session: Session, args) -> None:
    options = options_of(args)
    with core_errors():
        if args.reset or args.config is not None or options:
            cfg = session.set_defaults(options, config_file=args.config, reset=args.reset)
            changed = True
        else:
            cfg, changed = session.resolve(), False
        plan = make_plan(cfg)
    if args.save:
        save(plan, args.save)
    elif changed:
        shown = ", ".join(f"{k}={v!r}" for k, v in session.defaults.items()) or "none"
        file = f"; config file: {session.config_file}" if session.config_file else ""
        print(f"defaults: {shown}{file}")
        print(plan.describe())
    else:
        rows = [(name, value, cfg.source_of(name)) for name, value in cfg.as_dict().items()]
        print(text.table(rows, ("field", "value", "source")))
        print()
        print(plan.describe())
        if plan.uses_deepspeed:
            print("DeepSpeed config:")
            print(plan.deepspeed_json())


def save(plan, path: str) -> None:
    """Write the resolved configuration as an accelerate config YAML."""
    from nexa_nb import export

    try:
        export.save_accelerate_config(plan.config, path)
    except OSError as exc:
        raise UsageError(
            f"cannot write {path!r} ({exc.strerror or exc}). Fix: pass a file path in a writable folder."
        ) from None
    print(f"wrote {path}; run a script with it: accelerate launch --config_file {path} SCRIPT")
    if plan.uses_deepspeed and plan.device == "cpu" and plan.procs > 1:
        print(
            "note: without a GPU, `accelerate test` fails on this file: its test script sets no gloo "
            "backend for DeepSpeed, so each process believes it is alone (nexa_nb's engine sets it)"
        )
