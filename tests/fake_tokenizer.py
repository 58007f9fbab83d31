"""A hand-made "slow" tokenizer for model-independent tests of detokenization and output
processing: token i is the literal string PIECES[i]."""


class FakeTokenizer:
    """Token i is the literal string PIECES[i]; "</s>" (EOS) and "<sp>" are special."""

    PIECES = ["</s>", "a", "b", "c", "ab", "cd", "e", " ", "STOP", "<sp>", "xy", "!"]
    is_fast = False
    eos_token_id = 0
    all_special_tokens = ["</s>", "<sp>"]

    def __len__(self):
        return len(self.PIECES)

    def get_added_vocab(self):
        return {"</s>": 0, "<sp>": 9}

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        toks = [self.PIECES[i] for i in ids]
        if skip_special_tokens:
            toks = [t for t in toks if t not in self.all_special_tokens]
        return toks

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)
