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
