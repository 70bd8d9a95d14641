#!/usr/bin/env bash
# Upstream's scripts/text_condition/train_videoae_65x256x256.sh as an osp train-t2v launch (spec C.6):
# LatteT2V-XL/122, 65 frames at 256x256, 4 images per clip, batch 4 per GPU, lr 2e-5
# constant, bf16, gradient checkpointing, DeepSpeed ZeRO-2 on 8 GPUs, checkpoints every 500 steps.
# Set DATA (caption JSON), VIDEOS (its video folder), VAE (CausalVideoVAE folder), T5 (local
# t5-v1_1-xxl folder); PRETRAINED (optional) is the previous stage's output_dir/model (upstream
# passes a placeholder t2v.pt). Extra flags go after the script's name, e.g. osp's recommended
# --use_ema --cfg_dropout 0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m osp train-t2v \
  --model LatteT2V-XL/122 --text_encoder_name "$T5" --ae_path "$VAE" \
  --data_path "$DATA" --video_folder "$VIDEOS" --sample_rate 1 --num_frames 65 --max_image_size 256 \
  --gradient_checkpointing --train_batch_size 4 --dataloader_num_workers 10 --gradient_accumulation_steps 1 \
  --max_train_steps 1000000 --learning_rate 2e-05 --lr_scheduler constant --lr_warmup_steps 0 \
  --mixed_precision bf16 --checkpointing_steps 500 --allow_tf32 --model_max_length 300 \
  --use_image_num 4 --use_img_from_vid --output_dir t2v-f65-256-img4-videovae488-bf16-ckpt-xformers-bs4-lr2e-5-t5 \
  --resume_from_checkpoint latest ${PRETRAINED:+--pretrained "$PRETRAINED"} "$@"
