"""Built-in calibration prompts: varied subjects, scenes and styles, as Q-Diffusion's
text-guided calibration uses captions rather than one repeated prompt."""

CALIBRATION_FILE = "calibration_prompts.txt"  # a model folder's own prompts (see ptq.model_calibration_prompts)

CALIBRATION_PROMPTS = (
    "a photo of a dog on the beach",
    "a red car parked in a quiet street at night",
    "a bowl of fruit on a wooden table, still life painting",
    "a portrait of an old man with a grey beard",
    "a castle on a hill under a stormy sky",
    "a cat sleeping on a blue sofa",
    "an astronaut riding a horse in the desert",
    "a watercolor painting of a forest in autumn",
    "a close up photo of a yellow flower in the rain",
    "a city skyline at sunset, digital art",
    "a small boat on a calm lake with mountains",
    "a cup of coffee next to a book on a desk",
    "a pencil sketch of a bird on a branch",
    "a snowy village at night with warm lights",
    "a green dragon flying over the sea, fantasy art",
    "a plate of pasta with tomato sauce, food photography",
)


def read_prompt_file(path) -> list[str]:
    """Read one prompt per line, skipping blank lines and lines starting with '#'.

    Raises:
        QPDeployError: the file is missing, unreadable or holds no prompt.
    """
    from pathlib import Path

    from .errors import QPDeployError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QPDeployError(f"cannot read prompt file {path}: {exc.__class__.__name__}") from exc
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise QPDeployError(f"prompt file {path} holds no prompt (one per line expected)")
    return prompts


def check_text(value: str | None, what: str) -> None:
    """Refuse text that is not valid Unicode (bytes a terminal passed through undecoded).

    Raises:
        QPDeployError: naming ``what`` (e.g. "--prompt").
    """
    from .errors import QPDeployError

    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise QPDeployError(f"{what} is not valid UTF-8 text") from None


def check_prompt_tokens(tokenizer, prompt: str | None, what: str = "prompt") -> None:
    """Check a prompt against the text encoder's tokenizer before it is used.

    Raises QPDeployError for text that is not valid UTF-8; warns (one short line each)
    naming the words a word-level vocabulary does not know (they would silently become its
    unknown token), and when the prompt is longer than the encoder takes (then truncated).
    """
    import warnings

    check_text(prompt, what)
    if not prompt or tokenizer is None:
        return
    unknown = unknown_words(tokenizer, prompt)
    if unknown:
        warnings.warn(f"{what} has words this model's tokenizer does not know (read as {tokenizer.unk_token!r}): "
                      f"{', '.join(unknown[:8])}{', ...' if len(unknown) > 8 else ''}", UserWarning, stacklevel=2)
    limit = tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) > limit:
        kept = tokenizer.decode(ids[: limit - 1], skip_special_tokens=True)
        shown = kept if len(kept) <= 60 else "..." + kept[-57:]
        warnings.warn(f"{what} has {len(ids)} tokens but the text encoder takes {limit}: truncated to {shown!r}",
                      UserWarning, stacklevel=2)


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of ``prompt`` that ``tokenizer`` reads as its unknown token (none for BPE
    tokenizers such as CLIP's, which never produce one and reuse its id for end-of-text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    special = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    if unk is None or unk in special:
        return []
    if unk not in tokenizer(prompt, verbose=False)["input_ids"]:
        return []
    words = dict.fromkeys(prompt.replace(",", " ").split())
    return [w for w in words if unk in tokenizer(w, add_special_tokens=False, verbose=False)["input_ids"]]
