//! `arbor chat`: an interactive conversation rendered with the model's chat template.

use super::model::ModelArgs;
use super::run::SamplingArgs;
use arbor_runtime::{generate, ChatMessage};
use clap::Args;
use std::io::{BufRead, Write};

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let mut opts = args.sampling.options()?;
    let (mut engine, tok, _) = args.model.load()?;
    if tok.chat_template().is_none() {
        anyhow::bail!("this model has no chat template; use `arbor run` instead");
    }
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    eprintln!(
        "Chatting ({} layers, context {}). /reset clears the conversation, /exit or Ctrl-D quits.",
        engine.model.cfg.num_layers, engine.model.cfg.max_context
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.truncate(usize::from(args.system.is_some()));
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        let rendered = tok.apply_chat_template(&messages, true)?;
        let ids = tok.encode(&rendered, false, true)?;
        let mut reply = String::new();
        let mut out = std::io::stdout().lock();
        let result = generate(&mut engine, &tok, &ids, &opts, &mut |t| {
            reply.push_str(t);
            let _ = out.write_all(t.as_bytes()).and_then(|_| out.flush());
        });
        let _ = writeln!(out);
        match result {
            Ok(_) => messages.push(ChatMessage::new("assistant", reply)),
            Err(e) => {
                // Keep the session: drop the turn that failed (e.g. the context is full).
                messages.pop();
                eprintln!("error: {e}");
            }
        }
        opts.sampling.seed = opts.sampling.seed.wrapping_add(1);
    }
    Ok(())
}
