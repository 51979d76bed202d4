//! `arbor info`: what a model is and what it costs to run.

use super::model::ModelArgs;
use clap::Args;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn info(args: InfoArgs) -> anyhow::Result<()> {
    let path = args.model.resolve()?;
    let (engine, tok, load_secs) = args.model.load()?;
    let c = &engine.model.cfg;
    let layout = engine.cache().layout();
    let kv_f32 = layout.bytes_per_token(4);
    let kv_bf16 = layout.bytes_per_token(2);
    let cpu_dtype = args.model.kv_dtype();
    let kv_cpu = layout.bytes_per_token(cpu_dtype.bytes());
    let cpu_name = format!("{cpu_dtype:?}").to_lowercase();
    let v = serde_json::json!({
        "model": path.display().to_string(),
        "architecture": c.arch.name(),
        "quantization": engine.model.quantization,
        "parameters": c.param_count(),
        "weight_bytes": engine.model.weight_bytes(),
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "context_length": c.max_context,
        "rope_layout": format!("{:?}", c.rope_layout),
        "sliding_window": c.sliding_window,
        "kv_dtype_cpu": cpu_name,
        "kv_bytes_per_token_cpu": kv_cpu,
        "kv_bytes_per_token_f32": kv_f32,
        "kv_bytes_per_token_bf16": kv_bf16,
        "kv_pages": engine.cache().allocator().num_total(),
        "kv_page_size": layout.page_size,
        "chat_template": tok.chat_template().is_some(),
        "backend": engine.describe_device(),
        "device": engine.device().to_string(),
        "threads": rayon::current_num_threads(),
        "load_secs": load_secs,
        "build": format!("{} {}", env!("ARBOR_GIT_SHA"), env!("ARBOR_FEATURES")),
    });
    if args.json {
        println!("{v}");
        return Ok(());
    }
    println!("model          {}", path.display());
    println!(
        "architecture   {} ({} layers, hidden {}, {} heads / {} KV heads × {})",
        c.arch.name(),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim
    );
    println!("parameters     {:.1} M", c.param_count() as f64 / 1e6);
    println!("quantization   {}", engine.model.quantization);
    println!(
        "weights        {:.1} MiB in memory",
        engine.model.weight_bytes() as f64 / (1 << 20) as f64
    );
    println!(
        "vocabulary     {} tokens (tokenizer {})",
        c.vocab_size,
        tok.vocab_size()
    );
    println!("context        {} tokens", c.max_context);
    println!(
        "KV per token   {kv_cpu} bytes {cpu_name} (CPU; {kv_f32} as f32), {kv_bf16} bytes bf16 (GPU)"
    );
    println!(
        "KV cache       {} pages × {} tokens",
        engine.cache().allocator().num_total(),
        layout.page_size
    );
    println!("backend        {}", engine.describe_device());
    println!(
        "build          {} {}",
        env!("ARBOR_GIT_SHA"),
        env!("ARBOR_FEATURES")
    );
    Ok(())
}
