"""Text in and out: the tokenizer (tokenizer.json / SentencePiece / GGUF vocabulary), the Gemma 4 and
Gemma 3 chat formats and their parser, and tokenization analysis."""

from gemma4.text.tokenizer import Tokenizer, TokenizerError, UnknownTokenError, load_tokenizer
from gemma4.text.chat import (ChatError, ChatPrompt, ChatSegment, ParsedResponse, ToolCall, parse_response, render_chat,
                              render_chat_segments)

__all__ = ["Tokenizer", "TokenizerError", "UnknownTokenError", "load_tokenizer", "ChatError", "ChatPrompt",
           "ChatSegment", "ParsedResponse", "ToolCall", "parse_response", "render_chat", "render_chat_segments"]
