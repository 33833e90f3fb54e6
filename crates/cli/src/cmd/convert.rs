//! `ds4 convert --from-hf DIR -o OUT.gguf [--type f32|f16|q8_0|q2|q4]`: Hugging Face
//! DeepseekV4 checkpoint → ds4 Flash GGUF.

use std::path::PathBuf;

use anyhow::Context;
use ds4_convert::{ConvertOptions, OutType, Progress};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory: config.json, *.safetensors and tokenizer.json.
    #[arg(long = "from-hf", value_name = "DIR")]
    pub from_hf: PathBuf,
    /// Output GGUF file (written atomically).
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Tensor types: f32/f16 everywhere the published files quantize, q8_0, or the
    /// published q2/q4 layouts.
    #[arg(long = "type", value_name = "TYPE", default_value = "f16")]
    pub out_type: OutType,
    /// `general.name` (default: the checkpoint directory's name).
    #[arg(long)]
    pub name: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = ConvertOptions {
        out_type: args.out_type,
        name: args.name,
    };
    // Hidden automatically when stderr is not a terminal.
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report =
        ds4_convert::convert_hf_with_progress(&args.from_hf, &args.output, &opts, &mut |event| {
            match event {
                Progress::Start { elements, .. } => bar.set_length(elements),
                Progress::Tensor {
                    name, ty, elements, ..
                } => {
                    bar.inc(elements);
                    bar.set_message(format!("{name} ({})", ty.name()));
                }
                Progress::Writing { path, bytes } => {
                    bar.set_message(format!("writing {} ({bytes} tensor bytes)", path.display()));
                }
            }
        });
    bar.finish_and_clear();
    let report = report.with_context(|| {
        format!(
            "converting {} to {}",
            args.from_hf.display(),
            args.output.display()
        )
    })?;
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(ty, n)| format!("{n} {}", ty.name()))
        .collect();
    println!(
        "wrote {}: {} tensors, {} bytes of tensor data ({}), type {}",
        args.output.display(),
        report.tensors,
        report.tensor_bytes,
        types.join(", "),
        args.out_type
    );
    for note in &report.notes {
        println!("note: {note}");
    }
    Ok(())
}
