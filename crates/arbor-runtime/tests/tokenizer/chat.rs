//! Chat templates.

use super::*;

const LLAMA3_STYLE: &str = "{{- bos_token }}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

const QWEN2_STYLE: &str = "{%- if messages[0].role != 'system' %}\
{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}\
{%- endif %}\
{%- for message in messages %}\
{%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role: ' ~ message.role) }}{% endif %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "  Hi there  "),
        ChatMessage::new("assistant", "Hello."),
        ChatMessage::new("user", "Bye"),
    ]
}

#[test]
fn chat_template_llama3_style() {
    let t = ChatTemplate::new(LLAMA3_STYLE).unwrap();
    let out = t
        .render(&conversation(), true, "<|begin_of_text|>", "<|eot_id|>")
        .unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn chat_template_qwen2_style_and_errors() {
    let t = ChatTemplate::new(QWEN2_STYLE).unwrap();
    let out = t
        .render(&conversation()[1..2], true, "", "<|im_end|>")
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let out = t.render(&conversation(), false, "", "").unwrap();
    assert!(out.starts_with("<|im_start|>system\nYou are terse.<|im_end|>\n"));
    assert!(out.ends_with("<|im_start|>user\nBye<|im_end|>\n"));

    let err = t
        .render(&[ChatMessage::new("wizard", "x")], false, "", "")
        .unwrap_err();
    match err {
        RuntimeError::ChatTemplate(msg) => assert!(msg.contains("Unknown role: wizard"), "{msg}"),
        other => panic!("wrong error {other:?}"),
    }
    assert!(matches!(
        ChatTemplate::new("{% for x in %}"),
        Err(RuntimeError::ChatTemplate(_))
    ));
}

#[test]
fn chat_template_python_methods_and_tojson() {
    let src = "{{ messages[0].content.upper() }}|{{ messages[0].content.startswith('hel') }}|\
               {{ messages[0].content.split(' ') | length }}|{{ messages | tojson }}|\
               {% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
    let t = ChatTemplate::new(src).unwrap();
    let out = t
        .render(
            &[ChatMessage::new("user", "hello big \"world\"")],
            false,
            "",
            "",
        )
        .unwrap();
    assert_eq!(
        out,
        "HELLO BIG \"WORLD\"|True|3|[{\"role\": \"user\", \"content\": \"hello big \\\"world\\\"\"}]|a=1"
    );
}

#[test]
fn chat_template_json_context() {
    let src =
        "{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls | tojson }}\
               {% else %}{{ m.content }}{% endif %};{% endfor %}{{ tools is none }}";
    let t = ChatTemplate::new(src).unwrap();
    let ctx = serde_json::json!({
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "tool_calls": [{"arguments": {"x": 1}, "name": "f"}]}],
        "tools": null
    });
    assert_eq!(
        t.render_json(&ctx).unwrap(),
        "user:hi;assistant:[{\"arguments\": {\"x\": 1}, \"name\": \"f\"}];True"
    );
    assert_eq!(
        t.render(&[ChatMessage::new("user", "x")], false, "", "")
            .unwrap(),
        "user:x;True"
    );
    assert!(t.render_json(&serde_json::json!([1])).is_err());
}
