"""tokenprune.visualize: the arrays behind the pictures equal what the forward did."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import images, tiny_timm

import tokenprune
import tokenprune.visualize as tv

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def traced_report(method, **options):
    model, x = tiny_timm(), images()
    tokenprune.apply(model, method, trace_source=True, **options)
    with torch.inference_mode():
        model(x)
    return tokenprune.last_forward(model), x


@pytest.mark.parametrize("method,options", [("tome", {"keep": 0.25}), ("mctf", {"keep": 0.25, "min_tokens": 0}),
                                            ("random", {"keep": 0.25}), ("zero-tprune", {"keep": 0.25})])
def test_groups_are_the_source_map(method, options):
    report, _ = traced_report(method, **options)
    groups = tv.token_groups(report, (8, 8))
    assert groups.shape == (2, 8, 8)
    p = report.num_prefix_tokens
    for b in range(2):
        flat = groups[b].reshape(-1)
        for token in range(report.output_tokens - p):  # every output patch token: the patches it absorbed
            members = set(np.flatnonzero(flat == token).tolist())
            assert members == set(torch.nonzero(report.source[b, p + token, p:]).flatten().tolist())
            expected_size = 1 if report.size is None else int(report.size[b, p + token, 0])
            assert len(members) == expected_size
        dropped = flat < 0
        assert int(dropped.sum()) == (64 - 16 if method in ("random", "zero-tprune") else 0)


def test_groups_need_the_source_map():
    model = tiny_timm()
    tokenprune.apply(model, "tome", keep=0.5)
    with torch.inference_mode():
        model(images())
    with pytest.raises(ValueError, match="trace_source=True"):
        tv.token_groups(tokenprune.last_forward(model), (8, 8))
    report, _ = traced_report("tome", keep=0.5)
    with pytest.raises(ValueError, match="not a 4x4 grid"):
        tv.token_groups(report, (4, 4))


def test_group_colours_paint_each_group_with_its_mean_and_drops_dark():
    rng = np.random.default_rng(0)
    image = rng.random((8, 8, 3))
    groups = np.array([[0, 0, 1, -1], [2, 1, 1, -1], [2, 2, 3, 3], [4, 4, 4, 4]])
    out = tv.group_colours(image, groups)
    patches = image.reshape(4, 2, 4, 2, 3).transpose(0, 2, 1, 3, 4)  # (rows, cols, 2, 2, 3)
    painted = out.reshape(4, 2, 4, 2, 3).transpose(0, 2, 1, 3, 4)
    for g in range(5):
        where = groups == g
        np.testing.assert_allclose(painted[where], np.broadcast_to(patches[where].reshape(-1, 3).mean(0),
                                                                    painted[where].shape))
    np.testing.assert_allclose(painted[groups < 0], np.broadcast_to(tv.DROPPED, painted[groups < 0].shape))


def test_show_tokens_draws_the_groups_and_saves(tmp_path):
    report, x = traced_report("tome", keep=0.25)
    groups = tv.token_groups(report, (8, 8))[0]
    fig = tv.show_tokens(x[0], groups, path=tmp_path / "tokens.png")
    assert (tmp_path / "tokens.png").stat().st_size > 0
    drawn = np.asarray(fig.axes[1].images[0].get_array())
    np.testing.assert_allclose(drawn, tv.group_colours(np.asarray(fig.axes[0].images[0].get_array()), groups))
    assert fig.axes[1].get_title() == "16 tokens of 64 patches"
    assert tv.show_tokens(x[0], groups, title="tome").axes[1].get_title() == "tome: 16 tokens of 64 patches"


def test_token_count_plot_holds_each_methods_counts():
    tome, _ = traced_report("tome", keep=0.25)
    fig = tv.plot_token_counts({"tome": tome, "by hand": [65, 40, 17]})
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert lines == {"tome": tome.token_counts + [tome.output_tokens], "by hand": [65, 40, 17]}


def test_show_command_writes_a_png_per_method_and_the_counts(tmp_path, capsys):
    from tokenprune.cli import main

    assert main(["show", "--method", "tome", "random", "--keep", "0.5", "--out", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / name) for name in ("tome.png", "random.png", "token_counts.png")]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("tome.png", "random.png", "token_counts.png"))


@pytest.mark.parametrize("argv,message", [
    (["--image", "no/such.png"], "--image no/such.png is not a file"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--keep", "2"], "keep must be in (0, 1]"),
    (["--model", "vit_tiny_patch16_224"], "give an image"),
    (["--model", "hf:vit"], "show draws timm ViTs only"),
    (["--method", "hiprune"], "--method hiprune is a visual-token selector"),
    (["--method", "tome", "random-select"], "`tokenprune show` runs image encoders, which take mctf, random, tome"),
    (["-o", "trace_source=False"], "show (render) sets trace_source=True itself"),
])
def test_show_command_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
    from tokenprune.cli import main

    assert main(["show", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_show_command_checks_the_image_and_the_model_before_drawing(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from tokenprune.cli import main

    monkeypatch.setattr(tv, "show_tokens", lambda *a, **k: pytest.fail("drew with a bad image or model"))
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    for argv, message in ((["--image", str(tmp_path / "notes.png")], "notes.png is not an image PIL can read"),
                          (["--model", "resnet18", "--image", str(tmp_path / "red.png")],
                           "tokenprune does not support timm.models.resnet.ResNet")):
        assert main(["show", "--out", str(tmp_path), "--method", "tome", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err[-3000:]


def test_kept_groups_follow_a_vlm_report():
    from test_vlm import llava_batch, tiny_llava

    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    with torch.no_grad():
        model(**inputs)
    kept = tokenprune.last_forward(model).kept
    assert [int(k.sum()) for k in kept] == [16, 16, 16]
    groups = tv.kept_groups(kept[1], (8, 8))
    np.testing.assert_array_equal(groups.reshape(-1) >= 0, kept[1].numpy())
    np.testing.assert_array_equal(groups.reshape(-1)[kept[1].numpy()], np.flatnonzero(kept[1].numpy()))
    with pytest.raises(ValueError, match="do not fill a 4x4 grid"):
        tv.kept_groups(kept[1], (4, 4))


def test_roles_are_drawn_from_the_report(tmp_path):
    from test_vlm import llava_batch, tiny_llava

    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2, alpha=1.0)  # 3 anchors of 16 tokens
    with torch.no_grad():
        model(**inputs)
    report = tokenprune.last_forward(model)
    roles = report.roles[0].numpy().reshape(8, 8)
    assert all((roles == role).any() for role in (1, 2, 3))
    fig = tv.show_roles(inputs["pixel_values"][0], report.roles[0], (8, 8), report.role_names,
                        path=tmp_path / "roles.png")
    assert (tmp_path / "roles.png").stat().st_size > 0
    drawn = np.asarray(fig.axes[0].images[0].get_array())  # 32x32: 4x4 pixels per token
    picture = tv._as_image(inputs["pixel_values"][0])
    np.testing.assert_allclose(drawn, tv.role_colours(picture, roles))
    painted, seen = (a.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4) for a in (drawn, picture))  # per token
    np.testing.assert_allclose(painted[roles == 0], tv.DIMMED * seen[roles == 0])
    for role in (1, 2, 3):  # a kept token is half its role's colour
        expected = 0.5 * seen[roles == role] + 0.5 * np.asarray(tv.ROLE_COLOURS[role - 1])
        np.testing.assert_allclose(painted[roles == role], expected)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"{name} ({int((roles == i).sum())})" for i, name in enumerate(report.role_names)]
    assert int((roles > 0).sum()) == 16


def test_role_colours_tint_kept_patches_and_paint_dropped_ones():
    image = np.full((4, 4, 3), 0.5)
    roles = np.array([[0, 1], [2, 3]])
    out = tv.role_colours(image, roles, blend=0.5)
    np.testing.assert_allclose(out[:2, :2], np.full((2, 2, 3), 0.5 * tv.DIMMED))
    np.testing.assert_allclose(out[:2, 2:], np.broadcast_to(0.25 + 0.5 * np.array(tv.ROLE_COLOURS[0]), (2, 2, 3)))
    np.testing.assert_allclose(out[2:, 2:], np.broadcast_to(0.25 + 0.5 * np.array(tv.ROLE_COLOURS[2]), (2, 2, 3)))


def test_render_draws_the_crop_the_model_saw(tmp_path, monkeypatch):
    # vit_tiny's eval transform resizes the short side to 248 and centre-crops 224: of a 300x100 image in
    # blue, red and green thirds the model sees only red, and the patch grid lies on that crop
    from PIL import Image

    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :100, 2] = image[:, 200:, 1] = 255
    image[:, 100:200] = (200, 64, 0)  # values between the normalisation's mean and its ends: undone exactly
    drawn = []
    show_tokens = tv.show_tokens
    monkeypatch.setattr(tv, "show_tokens", lambda *a, **k: drawn.append(show_tokens(*a, **k)) or drawn[-1])
    tv.render("vit_tiny_patch16_224", Image.fromarray(image), methods=("random",), keep=0.5, out_dir=str(tmp_path))
    picture = np.asarray(drawn[0].axes[0].images[0].get_array())
    np.testing.assert_allclose(picture, np.broadcast_to([200 / 255, 64 / 255, 0.0], picture.shape), atol=0.02)


def test_render_draws_every_packaged_testbed_with_its_trained_weights(tmp_path, monkeypatch):
    import timm
    from PIL import Image

    from tokenprune import flops, testbed

    created = []
    create = flops.create_timm_model
    monkeypatch.setattr(flops, "create_timm_model", lambda name, pretrained=False: created.append(pretrained)
                        or create(name, pretrained))
    image = Image.fromarray(np.zeros((56, 56), np.uint8))
    for name in testbed.TESTBEDS:
        tv.render(name, image, methods=("random",), keep=0.5, out_dir=str(tmp_path))
    assert created == [True] * len(testbed.TESTBEDS)
    trained = timm.create_model("vit_testbed_mosaic", pretrained=True).state_dict()
    assert any(not torch.equal(p, trained[k]) for k, p in timm.create_model("vit_testbed_mosaic").state_dict().items())


@pytest.mark.parametrize("shape", [(32, 32, 4), (1, 3, 32, 32), (2, 32, 32), (2, 32, 32, 3)])
def test_an_image_of_another_shape_is_refused_in_one_line(shape):
    # an RGBA array (plt.imread of a PNG) or a batch (the model's input x, not x[0]) failed inside numpy or
    # matplotlib ("cannot reshape array of size 4096 into shape (8,4,8,4,3)")
    image = np.random.default_rng(0).random(shape)
    for draw in (lambda: tv.show_tokens(image, np.arange(64).reshape(8, 8)),
                 lambda: tv.show_roles(image, np.ones(64, int), (8, 8), ["dropped", "kept"])):
        with pytest.raises(ValueError, match=r"an image of shape .* give a PIL image, .*\(H, W, 3\)") as error:
            draw()
        assert len(str(error.value).splitlines()) == 1


def test_an_image_with_negative_values_is_stretched_to_the_unit_range():
    # a normalised tensor (the model's input, not undone): min to 0, max to 1, linearly between
    image = torch.linspace(-2.0, 2.0, 3 * 8 * 8).reshape(3, 8, 8)
    array = tv._as_image(image)
    np.testing.assert_allclose(array, (image.permute(1, 2, 0).numpy() + 2.0) / 4.0, atol=1e-6)
