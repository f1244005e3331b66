"""What kacq_hooks knows about model families by name: output-projection paths, name patterns, the
class and path names that mean an FFN or a sequence mixer, refused types and stacks, odd C layouts."""
from __future__ import annotations

import re

# model_type -> the output projection's path inside one block (a regex over the block-relative path).
MLP_OUT_BY_MODEL_TYPE: dict[str, str] = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "olmo3", "gemma", "gemma2", "gemma3_text",
         "stablelm", "granite", "cohere", "cohere2", "phi3", "smollm3", "helium", "glm", "ministral"],
        r"mlp\.down_proj"),
    "gpt2": r"mlp\.c_proj",
    "gpt_neo": r"mlp\.c_proj",
    "gpt_neox": r"mlp\.dense_4h_to_h",
    "falcon": r"mlp\.dense_4h_to_h",
    "bloom": r"mlp\.dense_4h_to_h",
    "phi": r"mlp\.fc2",
    "gptj": r"mlp\.fc_out",
    "codegen": r"mlp\.fc_out",
    "opt": r"fc2",
    "recurrent_gemma": r"mlp_block\.down_proj",
    "rwkv": r"feed_forward\.value",          # channel mixing: value(relu(key x)^2), C = relu(key x)^2
    "xlstm": r"ffn\.proj_down",
    "xlnet": r"ff\.layer_2",
    "t5": r"layer\.\d+\.DenseReluDense\.wo",
}

# Block-relative regexes tried in order when the table has no entry; the first that matches any
# block of a stack is used for all its blocks (blocks without it, e.g. a hybrid's mixer-only
# blocks, get no site).
FFN_OUT_PATTERNS = (
    r"mlp\.down_proj", r"mlp\.c_proj", r"mlp\.dense_4h_to_h", r"mlp\.fc2", r"mlp\.fc_out", r"mlp\.w2",
    r"mlp\.out_proj", r"mlp\.proj_out", r"mlp\.output_linear", r"mlp\.down", r"mlp\.wo", r"mlp\.linear_fc2",
    r"mlp\.fc_2", r"mlp\.dense_out", r"mlp\.linear_2", r"mlp_block\.down_proj", r"shared_mlp\.output_linear",
    r"feed_forward\.w2", r"feed_forward\.down_proj", r"feed_forward\.output", r"feed_forward\.fc2",
    r"feed_forward\.output_dense", r"feed_forward\.layer_2", r"ffn\.down_proj", r"ffn\.fc2", r"ffn\.w2",
    r"ffn\.lin2", r"ffn\.proj_down", r"ffn\.output", r"ffn\.layer_2", r"ffn\.ffn\.w_out", r"ffn\.w_out",
    r"ffn\.dense_out", r"ff\.layer_2", r"ff\.fc2", r"(?:layer\.\d+\.)?DenseReluDense\.wo",
    r"(?:layer\.\d+\.)?DenseGatedActDense\.wo", r"output\.dense", r"fc2", r"mixer\.down_proj",
)

_FFN_CLASS = re.compile(r"MLP|Mlp|FeedForward|FFN|Ffn|DenseReluDense|DenseGatedActDense|ChannelMix|SparseMoe|"
                        r"Experts|MoeBlock|SparseMLP|DenseActDense", re.I)  # class names that mean "an FFN"
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.IGNORECASE)

_VISION = re.compile(r"vision|visual|image|vit$|patch", re.I)
_AUDIO = re.compile(r"audio|speech|acoustic|sound", re.I)
# Block-relative paths inside these are never an FFN: attention and sequence mixers (state-space,
# linear attention, recurrences, convolutions). Matched on path parts and on module class names.
_MIXER_PART = re.compile(r"^(mixer|mamba|ssm|linear_attn|temporal_block|time_mix|mlstm_layer|slstm_layer|"
                         r"short_conv|conv|recurrent|rnn|lru|token_mixer)$", re.I)
_MIXER_CLASS = re.compile(r"Attention|Attn|Mamba|Mixer|Ssm|SSM|DeltaNet|Recurrent|Rglru|LSTMLayer|ShortConv|"
                          r"TimeMix|SelfAtt", re.I)
_MLP_CLASS = re.compile(r"MLP|Mlp|FeedForward|FFN|Ffn|DenseReluDense|DenseGatedActDense|ChannelMix", re.I)

# Models whose FFN is there but whose layout kacq_hooks cannot yet attribute per layer and position:
# refused by name before any forward, with the reason.
REFUSED_MODEL_TYPES: dict[str, str] = {
    "cpmant": "CPM-Ant prepends prompt positions inside the model, so each FFN sees more positions than "
              "input_ids has and no padding mask lines up with them",
    "albert": "ALBERT applies one shared layer at every depth, so one module's input mixes all layers",
    "hrm_text": "HRM runs its layers recurrently, several times per forward, so one module's input mixes "
                "those steps",
    "longformer": "Longformer pads the sequence to a multiple of its attention window inside the model, so each "
                  "FFN sees more positions than input_ids has",
    "led": "LED pads the sequence to a multiple of its attention window inside the model, so each FFN sees more "
           "positions than input_ids has",
    "funnel": "Funnel pools the sequence between blocks, so later FFNs see fewer positions than the mask covers",
    "pegasus_x": "PEGASUS-X runs each encoder FFN twice per forward (local and global tokens)",
    "zamba": "Zamba applies one shared transformer block (with its FFN) at several depths, so one module's "
             "input mixes those layers",
    "zamba2": "Zamba2 applies shared transformer blocks (with their FFN) at several depths, so one module's "
              "input mixes those layers",
}
# Stacks refused by model type (the rest of the model can still be measured with stacks=...).
REFUSED_STACKS: dict[tuple[str, str], str] = {
    ("prophetnet", "decoder"): "ProphetNet's decoder runs a main stream and n-gram prediction streams through "
                               "the same FFN in one call, so its positions are not the decoder's tokens",
    ("fsmt", "decoder"): "FSMT's decoder takes a padding mask of its own making (decoder_padding_mask), not an "
                         "attention_mask kacq_hooks can read",
    ("xlm-prophetnet", "decoder"): "XLM-ProphetNet's decoder runs a main stream and n-gram prediction streams "
                                   "through the same FFN in one call, so its positions are not the decoder's tokens",
}
# How C is laid out when it is not [batch, seq, d_ff].
LAYOUT_BY_MODEL_TYPE = {"xlnet": "seq_first", "fsmt": "seq_first", "opt": "flat"}
