from transformers import AutoModelForCausalLM, AutoTokenizer

from rlarith.tinymodel import init_model


def test_tiny_model_round_trips_through_from_pretrained(tmp_path):
    init_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 123 * 45.\nReply: 5,535"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text  # spaces and newlines survive the reload
    assert tok.padding_side == "left" and tok.eos_token == "<|im_end|>"
    assert model.config.vocab_size == len(tok) and model.num_parameters() < 2_000_000
