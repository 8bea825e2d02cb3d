"""The policy being trained: the built-in tiny model and its character tokenizer, any local Hugging
Face checkpoint, chat templates, the SFT warm start, and the trainer's log-prob forward.

- ``model``: ``ModelConfig`` / ``build_model`` / ``load_policy`` / ``save_policy`` (safetensors).
- ``tokenizer``: the built-in character tokenizer.
- ``chat``: prompts rendered as a chat user turn (``RunConfig.chat_template``).
- ``warm_start``: the cached SFT warm start of the built-in model; ``sft_batch`` (expert answers).
- ``logprobs``: ``token_logprobs``, the one trainer forward every step and study uses.
- ``build``: ``RunConfig`` -> task, policy, frozen reference copy.
"""
