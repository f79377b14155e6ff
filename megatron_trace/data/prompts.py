"""The student prompt and the teacher's privileged prompt, rendered with the model's chat template.

The student sees the problem. The teacher (same network) sees the problem, the reference solution and the
annotator's coarse span types (or, for ablations, its free-text labels) -- key and error kinds under their own
headings -- then the student's own response tokens. The privileged prompt is built from types/labels only: this
module never receives the response, so span text cannot leak into it.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def student_messages(
    problem: str, *, instruction: str = DEFAULT_INSTRUCTION, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """Chat messages of the student prompt: the problem and the answer-format instruction."""
    if not problem or not problem.strip():
        raise ValueError("student_messages: the problem text is empty")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    content = f"{problem.strip()}\n\n{instruction}" if instruction else problem.strip()
    messages.append({"role": "user", "content": content})
    return messages


def privileged_messages(
    problem: str,
    solution: str,
    labels: Sequence[str] = (),
    *,
    error_labels: Sequence[str] = (),
    key_types: Sequence[str] = (),
    error_types: Sequence[str] = (),
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages of the teacher's privileged prompt: problem + reference solution + span types or labels.

    key_types / error_types: coarse types (annotate.labels) of the key spans of a correct response / the error
    spans of an incorrect one, each under its own heading. labels / error_labels: free-text diagnostic labels of
    key / error spans (label_mode free_text), never the span text. Empty entries are skipped; a section with
    nothing in it is left out.
    """
    if not problem or not problem.strip():
        raise ValueError("privileged_messages: the problem text is empty")
    if not solution or not solution.strip():
        raise ValueError("privileged_messages: the reference solution is empty (the teacher needs one)")
    parts = [problem.strip(), f"Here is a reference solution:\n{solution.strip()}"]
    for heading, items in (("Kinds of key steps to get right", key_types), ("Kinds of errors to avoid", error_types),
                           ("Points to get right", labels), ("Mistakes to avoid", error_labels)):
        clean = [" ".join(str(item).split()) for item in items]
        clean = [item for item in clean if item]
        if clean:
            parts.append(f"{heading}:\n" + "\n".join(f"- {item}" for item in clean))
    if instruction:
        parts.append(instruction)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": "\n\n".join(parts)})
    return messages


def build_prompt_ids(tokenizer, messages: list[dict[str, str]], *, enable_thinking: bool) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, ending with the assistant turn's opening.

    enable_thinking: Qwen3's switch; False makes the template emit an empty `<think>\\n\\n</think>\\n\\n` so the
    model answers directly. Returns [prompt_len] ids (no padding).
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    return [int(i) for i in ids]
