"""Text in and out: the tokenizer (tokenizer.json / SentencePiece / GGUF vocabulary), the Gemma 4 and
Gemma 3 chat formats and their parser, and tokenization analysis."""

from gemma4.text.tokenizer import Tokenizer, load_tokenizer
from gemma4.text.chat import ParsedResponse, ToolCall, parse_response, render_chat

__all__ = ["Tokenizer", "load_tokenizer", "ParsedResponse", "ToolCall", "parse_response", "render_chat"]
