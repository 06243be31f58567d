"""RewardModelScorer: a learned reward model (``models.reward_model``) as one more reward component.

Any Hugging Face sequence-classification model with one output (the usual RLHF reward-model head:
``AutoModelForSequenceClassification``, ``num_labels = 1``, e.g. Skywork-Reward, ArmoRM-style
single-score heads) scores the *conversation*: the prompt as the user turn and the student's
completion as the assistant turn, rendered with the reward model's own chat template (its
tokenizer need not match the student's). The score is the head's raw output for the last
non-padding token, which is what such models are trained to emit; weight and mix it with rule
rewards in ``rewards: [{name: reward_model, weight: …}]``. It keeps the scorer contract
(core/records.py ``ScoreRecord``): one record per rollout, the raw score as the component
``reward_model``, weighted by the driver's combine (cluster/scoring.py) like any rule reward.

It runs in its own Ray actor (``resources.reward_model``: give it a GPU for a large model), in
parallel with the rule rewards and the teacher.
"""

from __future__ import annotations

import os

import torch

from protege.core.console import capture_actor_output
from protege.core.data import Example
from protege.core.env import configure_node_defaults
from protege.core.records import Rollout, ScoreRecord


class RewardModelScorer:
    component = "reward_model"  # the reward name the spec weights it by (rewards: [{name: reward_model}])

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        batch_size: int = 16,
        max_length: int = 1024,
        system_prompt: str | None = None,
    ):
        capture_actor_output()  # third-party output to RUN_DIR/logs (core/console.py)
        configure_node_defaults()  # this node's hardware decides, before the model loads
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if self.tokenizer.pad_token_id is None:  # batching needs one; any token works under the mask
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the end: the head reads the last token
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(model, dtype=getattr(torch, dtype))
            .to(self.device)
            .eval()
        )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"models.reward_model: {model} has {self.model.config.num_labels} outputs; a reward "
                "model has one (AutoModelForSequenceClassification with num_labels=1)"
            )
        # The head pools the last non-pad token; it must know the pad id to find it.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length, self.system_prompt = batch_size, max_length, system_prompt

    def pid(self) -> int:
        return os.getpid()

    def render(self, prompt: str, completion: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n{completion}"  # a base model without a template: plain concatenation

    def score(self, rollouts: list[Rollout], examples: list[Example]) -> list[ScoreRecord]:
        """The scorer contract: the conversation (examples[i]'s prompt, rollouts[i]'s text) scored."""
        if len(rollouts) != len(examples):
            raise ValueError(f"rollouts and examples must have equal lengths, got {len(rollouts)}, {len(examples)}")
        values = self.values([e.prompt for e in examples], [r.sample.text for r in rollouts])
        return [ScoreRecord(components={self.component: v}) for v in values]

    @torch.no_grad()
    def values(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The head's raw output for each (prompt, completion), batched."""
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions must have equal lengths, got {len(prompts)}, {len(completions)}")
        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            # Keep the end when truncating: the head reads the last token, the completion's end.
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            )
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out
