# An mtlm sequence head (classification or regression) over a Hugging Face encoder, written by
# `mtlm export RUN --task NAME --format hf` beside config.json (auto_map) and loaded with trust_remote_code=True.
# HF's own *ForSequenceClassification heads read a [CLS] pooler (BERT: dense + tanh) that mtlm's heads do
# not have; this class keeps mtlm's pooling (config.mtlm_pooling: "mean" over real tokens, or "cls") and its
# one linear layer, so its logits are mtlm's. Regression logits are in the target's units.
import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers import __CONFIG_CLASS__ as _BackboneConfig


class MtlmForSequenceClassification(PreTrainedModel):
    config_class = _BackboneConfig
    base_model_prefix = "backbone"

    def __init__(self, config):
        super().__init__(config)
        try:
            self.backbone = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:           # encoders without a pooler option
            self.backbone = AutoModel.from_config(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        if module is getattr(self, "classifier", None):
            module.weight.data.normal_(0.0, getattr(self.config, "initializer_range", 0.02))
            module.bias.data.zero_()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs).last_hidden_state
        if self.config.mtlm_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression":
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
