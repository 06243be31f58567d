"""Job data on the driver: load the spec's examples, split, and turn text into token ids.

Tokenisation happens once, here, with the student's tokenizer, so rollout workers, scorers and
learners all see the same ids (a teacher must share this tokenizer; checked at job start).
"""

from __future__ import annotations

from protege.core.data import Example, format_prompt, load_file, load_preferences, load_reasoning_gym, split


def load_job_data(spec) -> tuple[list, list[Example]]:
    """(train examples, held-out eval examples). An algorithm whose responses are the data's
    preference pairs (offline DPO) trains on PreferenceExamples."""
    d = spec.data
    if spec.algorithm.needs().responses == "preferences":
        prefs = load_preferences(
            d.path, prompt_field=d.prompt_field, chosen_field=d.chosen_field, rejected_field=d.rejected_field
        )
        if d.eval_size == 0:
            return prefs, []
        train, held = split(prefs, eval_size=d.held_out(len({p.prompt for p in prefs})), seed=d.seed)
        return train, [Example(prompt=p.prompt, answer=p.chosen, meta={}) for p in held]
    if d.source == "reasoning_gym":
        examples = load_reasoning_gym(d.task, size=d.size, seed=d.seed, config=d.task_config)
    else:
        examples = load_file(
            d.path, prompt_field=d.prompt_field, answer_field=d.answer_field, response_field=d.response_field
        )
    if d.eval_size == 0:
        return examples, []
    return split(examples, eval_size=d.held_out(len({e.prompt for e in examples})), seed=d.seed)


class Encoder:
    def __init__(self, tokenizer, *, system_prompt: str | None, max_prompt_tokens: int, template: str | None = None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.template = template  # data.prompt_template; None: the question then the answer-format instruction

    @classmethod
    def for_spec(cls, tokenizer, spec) -> "Encoder":
        return cls(
            tokenizer,
            system_prompt=spec.data.system_prompt,
            max_prompt_tokens=spec.rollout.max_prompt_tokens,
            template=spec.data.prompt_template,
        )

    def prompt(self, question: str, hint: str | None = None, *, raw: bool = False) -> list[int]:
        """Chat-templated prompt ids. ``raw`` skips the prompt template (teacher requests)."""
        text = question if hint is None else f"{question}\n\nHint: {hint}"
        messages = format_prompt(
            text, system_prompt=self.system_prompt, template="{question}" if raw else self.template
        )
        rendered = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tok.encode(rendered, add_special_tokens=False)
        # Keep the end (the instruction and the generation prompt) when a question is too long.
        return ids[-self.max_prompt_tokens :]

    def target(self, text: str) -> list[int]:
        """A supervised response: the text then end-of-sequence, as the chat template closes a turn."""
        return self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]

    def example_target(self, example: Example) -> list[int]:
        """The supervised response of a data row: its response field verbatim (data.response_field),
        else its answer in the answer format."""
        response = example.meta.get("response")
        return self.target(response) if response is not None else self.answer_target(example.answer)

    def answer_target(self, answer: str) -> list[int]:
        return self.target(f"<answer>{answer}</answer>")
