//! Strategies that search over steps: token-level and step-level beam search, DVTS,
//! lookahead, MCTS, REBASE, dynamic backtracking, and the prompt-composing tournament and
//! parallel-distill-refine.
