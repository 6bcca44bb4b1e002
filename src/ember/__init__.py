"""ember: a PyTorch-native inference engine and OpenAI-compatible server for Llama-family LLMs."""

from ember.llm import LLM
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
