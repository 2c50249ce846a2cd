"""Sample a continuation of a prompt from a trained model (greedy by default).

    python eval/generate.py --workdir=DIR --prompt=TEXT [--max_new_tokens=64]
                            [--temperature=0] [--top_k=K] [--top_p=P] [--seed=0]

Loads the latest checkpoint of DIR (train/main.py --workdir) and its tokenizer, fills the cache
with the prompt in one parallel pass, then decodes token by token until --max_new_tokens or the
tokenizer's end-of-text token. Prints the prompt followed by the continuation.
"""

import sys

from runway_jax.evaluation import flags


def _number(flag, text, low, high):
    try:
        value = float(text)
    except ValueError:
        raise flags.FlagError(f"{flag}={text!r} is not a number; give one in [{low}, {high}].") from None
    if not low <= value <= high:
        raise flags.FlagError(f"{flag}={text} is out of range; give one in [{low}, {high}].")
    return value


def main(argv=None) -> int:
    parser = flags.parser(__doc__, compare=False, workdir_help="training workdir to sample from "
                          "(train/main.py --workdir)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max_new_tokens", default="64", help="tokens to generate at most")
    parser.add_argument("--temperature", default="0", help="0: greedy; else sample at this temperature")
    parser.add_argument("--top_k", default=None, help="sample among the K most likely tokens only")
    parser.add_argument("--top_p", default=None, help="sample among the smallest set of tokens "
                        "whose probability reaches P (nucleus sampling), in (0, 1]")
    parser.add_argument("--seed", default="0", help="sampling seed")
    args = parser.parse_args(argv)
    try:
        flags.trained_workdir("--workdir", args.workdir)
        max_new_tokens = flags.integer("--max_new_tokens", args.max_new_tokens, high=1_000_000)
        temperature = _number("--temperature", args.temperature, 0.0, 100.0)
        top_k = None if args.top_k is None else flags.integer("--top_k", args.top_k)
        top_p = None if args.top_p is None else _number("--top_p", args.top_p, 1e-9, 1.0)
        seed = flags.integer("--seed", args.seed, low=0, high=2**31 - 1)
        if not args.prompt:
            raise flags.FlagError("--prompt is empty; give some text to continue.")
    except flags.FlagError as error:
        return flags.fail(error)
    import jax  # JAX from here on: the flags are sound
    import jax.numpy as jnp

    from runway_jax.decoding import generate
    from runway_jax.evaluation.workdirs import load_trained
    from runway_jax.training.checkpoint import CheckpointError
    from runway_jax.training.config import ConfigError

    try:
        model, config, tokenizer, step = load_trained(args.workdir)
    except (ConfigError, CheckpointError, ValueError) as error:
        return flags.fail(error)
    prompt = list(tokenizer.encode(args.prompt))
    print(f"{args.workdir}: step {step}, {len(prompt)} prompt tokens", file=sys.stderr, flush=True)
    tokens = generate(model, jnp.asarray([prompt], jnp.int32), max_new_tokens=max_new_tokens,
                      end_token=tokenizer.eos_id, pad_token=tokenizer.pad_id,
                      temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.key(seed))
    continuation = [int(t) for t in tokens[0, len(prompt):]]
    if tokenizer.eos_id in continuation:
        continuation = continuation[: continuation.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(continuation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
