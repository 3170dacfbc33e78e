"""``geodistill demo``: a local web page where the teacher, the baseline and the distilled student answer the
same question about the same image side by side.

    geodistill demo                                       # models/{teacher,student_sft,student_kd}
    geodistill demo --model big=/ckpt/llava-13b --model small=models/student_kd --port 7861

:mod:`.core` holds everything that is not web framework (image and question checks, held-out test items
with their ground truth, the models loaded once, answers with boxes, timing and scores) and imports no
Gradio; :mod:`.app` is the Gradio page around it, served offline on 127.0.0.1.
"""
